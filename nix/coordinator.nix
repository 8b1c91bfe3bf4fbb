# NixOS module for buildpool coordinators: `buildpool serve` for one repository each, as a
# user service of the user who owns the repository (coordinators live on workstations,
# beside the worktrees they serve).
#
#   imports = [ ./path/to/nix/coordinator.nix ];   # or inputs.buildpool.nixosModules.coordinator
#   services.buildpool.coordinators.project = {
#     package = pkgs.buildpool;                # your build of this repository's buildpool
#     user = "alice";
#     repository = "/home/alice/src/project";
#     websocketPort = 8081;                     # the job bus agents dial (TLS)
#     httpAddr = "127.0.0.1:8080";              # dashboard and /metrics
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.buildpool.coordinators;
  opt = import ./options.nix { inherit lib; };
  coordinator = { name, ... }: {
    options = with lib.types; {
      package = opt.required package "Package providing bin/buildpool.";
      user = opt.required str "The user whose user service runs it: the repository's owner.";
      repository = opt.required str "A worktree of the repository this coordinator serves."
        // { example = "/home/alice/src/project"; };
      websocketListenAddr = opt.given str ""
        "Where the job bus listens (TLS; the git tunnel on the same port); empty: every interface.";
      websocketPort = opt.given port 8081 "The job bus port agents dial.";
      gitDaemonPort = opt.given port 9418
        "The git daemon's port, on loopback (agents fetch through the tunnel).";
      httpAddr = opt.unset str "Where the dashboard and /metrics are served; null: buildpool's default."
        // { example = "127.0.0.1:8080"; };
      tlsCertFile = opt.unset path
        "The bus's certificate (PEM); null: a self-signed one made at first start, whose fingerprint agents pin.";
      tlsKeyFile = opt.unset path "The key of tlsCertFile.";
      tlsClientCaFile = opt.unset path
        "Require agents to present a client certificate signed by this CA (mutual TLS).";
      tokenFile = opt.unset str "The shared token; null: generated under the user's ~/.config/buildpool.";
      extraArgs = opt.given (listOf str) [ ] "More `buildpool serve` arguments.";
    };
    config = { };
  };
  serveArgs = c:
    [ "serve" "--websocket-listen-addr" c.websocketListenAddr
      "--websocket-port" (toString c.websocketPort)
      "--git-daemon-port" (toString c.gitDaemonPort) ]
    ++ lib.optionals (c.httpAddr != null) [ "--http-addr" c.httpAddr ]
    ++ lib.optionals (c.tlsCertFile != null) [ "--tls-cert-file" (toString c.tlsCertFile) ]
    ++ lib.optionals (c.tlsKeyFile != null) [ "--tls-key-file" (toString c.tlsKeyFile) ]
    ++ lib.optionals (c.tlsClientCaFile != null) [ "--tls-client-ca-file" (toString c.tlsClientCaFile) ]
    ++ lib.optionals (c.tokenFile != null) [ "--token-file" c.tokenFile ]
    ++ c.extraArgs;
in
{
  options.services.buildpool.coordinators = lib.mkOption {
    type = lib.types.attrsOf (lib.types.submodule coordinator);
    default = { };
    description = "Coordinators, one per repository, each a user service of its repository's owner.";
  };

  config = lib.mkIf (cfg != { }) {
    assertions = lib.mapAttrsToList (name: c: {
      assertion = (c.tlsCertFile == null) == (c.tlsKeyFile == null);
      message = "services.buildpool.coordinators.${name}: tlsCertFile and tlsKeyFile go together";
    }) cfg;

    # A user unit per coordinator, started with its user's session (lingering keeps it up
    # without one): the coordinator reads and snapshots the user's own worktrees.
    systemd.user.services = lib.mapAttrs' (name: c: lib.nameValuePair "buildpool-${name}" {
      description = "buildpool coordinator for ${c.repository}";
      wantedBy = [ "default.target" ];
      unitConfig.ConditionUser = c.user;
      path = [ pkgs.git pkgs.util-linux ];
      serviceConfig = {
        # Ready once every listener is up; the status line shows agents and jobs.
        Type = "notify";
        WatchdogSec = "30";
        WorkingDirectory = c.repository;
        ExecStart = lib.escapeShellArgs ([ "${c.package}/bin/buildpool" ] ++ serveArgs c);
        # SIGTERM stops the coordinator, its git daemon and its local jobs.
        KillMode = "mixed";
        Restart = "on-failure";
        RestartSec = "5";
      };
    }) cfg;

    users.users = lib.mapAttrs' (name: c: lib.nameValuePair c.user { linger = lib.mkDefault true; }) cfg;
  };
}
