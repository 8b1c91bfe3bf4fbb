# NixOS module for the buildpool build agent.
#
#   imports = [ ./path/to/nix/build-agent.nix ];
#   services.build-agent = {
#     enable = true;
#     package = pkgs.build-agent;            # your build of this repository's build-agent
#     serverUrls = [ "wss://coordinator:8081/ws" ];
#     tlsFingerprint = "sha256:...";         # as `buildpool serve` printed it
#     maxJobs = 4;
#     tokenFile = "/run/keys/buildpool-token";
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.build-agent;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "build-agent.toml" {
    servers = map
      (url: { inherit url; }
        // lib.optionalAttrs (cfg.tlsFingerprint != null) { tls_fingerprint = cfg.tlsFingerprint; }
        // lib.optionalAttrs (cfg.tlsCaFile != null) { tls_ca_file = cfg.tlsCaFile; })
      cfg.serverUrls;
    worker = {
      max_jobs = cfg.maxJobs;
      labels = cfg.labels;
      drain_timeout_secs = cfg.drainTimeoutSecs;
    } // lib.optionalAttrs (cfg.id != null) { id = cfg.id; };
    storage = {
      git_cache_dir = cfg.gitCacheDir;
      worktree_dir = cfg.worktreeDir;
      workspace_ttl_days = cfg.workspaceTtlDays;
    } // lib.optionalAttrs (cfg.maxDiskGb != null) { max_disk_gb = cfg.maxDiskGb; };
    nix = {
      env = cfg.env;
      prewarm_packages = cfg.prewarmPackages;
    };
    sandbox = {
      mode = cfg.sandbox;
      network = cfg.sandboxNetwork;
    };
  };
  opt = import ./options.nix { inherit lib; };
in
{
  options.services.build-agent = with lib.types; {
    enable = lib.mkEnableOption "the buildpool build agent";
    package = opt.required package "Package providing bin/build-agent.";
    serverUrls = opt.required (nonEmptyListOf str)
      "Coordinator job-bus URLs; one agent serves all of them from one slot pool."
      // { example = [ "wss://coordinator:8081/ws" ]; };
    tlsFingerprint = opt.unset str
      "Certificate fingerprint the coordinators must present (printed by `buildpool serve`)."
      // { example = "sha256:5b0f4c2e9a7d61e8c3b2a19f0e4d7c6b5a4938271605f4e3d2c1b0a9f8e7d6c5"; };
    tlsCaFile = opt.unset str "Or: CA file the coordinators' certificates must chain to.";
    serverUrl = opt.unset str "Single coordinator URL (seed compatibility); added to serverUrls.";
    id = opt.unset str "Agent id shown by coordinators; defaults to the hostname.";
    # Counts below must be at least 1.
    maxJobs = opt.given ints.positive 4 "Concurrent jobs, shared by all coordinators.";
    labels = opt.given (listOf str) [ ] "Labels jobs can require.";
    gitCacheDir = opt.given str "/var/cache/build-agent/repos"
      "One bare cache repository per source repository.";
    worktreeDir = opt.given str "/var/lib/build-agent/workspaces" "Per-slot warm workspaces.";
    env = opt.given (enum [ "auto" "nix" "host" ]) "auto"
      "Where jobs run: the repository's flake dev shell (auto, nix) or the host.";
    prewarmPackages = opt.given (listOf str) [ ]
      "Installables realised at start-up; failures are logged, not fatal."
      // { example = [ "nixpkgs#cargo" "nixpkgs#clippy" ]; };
    drainTimeoutSecs = opt.given ints.positive 600
      "How long stopping the service lets running jobs finish.";
    maxDiskGb = opt.unset (either ints.positive float)
      "Disk budget for workspaces and caches in GB; null: half the free space at start.";
    workspaceTtlDays = opt.given ints.positive 14
      "Repositories not built for this many days lose their workspaces and caches.";
    sandbox = opt.given (enum [ "bwrap" "none" ]) "bwrap"
      "How jobs are contained: a bubblewrap sandbox, or none (unsandboxed, warned).";
    sandboxNetwork = opt.given bool true
      "Whether sandboxed jobs reach the network (cargo fetches crates).";
    tokenFile = opt.required path
      "File holding the coordinators' shared token (passed as a systemd credential).";
  };

  config = lib.mkIf cfg.enable {
    assertions = [{
      assertion = cfg.sandbox != "bwrap" || config.security.allowUserNamespaces;
      message = "services.build-agent.sandbox = \"bwrap\" needs security.allowUserNamespaces = true (or set sandbox = \"none\").";
    }];
    services.build-agent.serverUrls = lib.mkIf (cfg.serverUrl != null) (lib.mkAfter [ cfg.serverUrl ]);
    systemd.services.build-agent = {
      description = "buildpool build agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      wants = [ "network-online.target" ];
      path = [ config.nix.package pkgs.git pkgs.bubblewrap ];
      serviceConfig = {
        Type = "notify";
        WatchdogSec = 30;
        TimeoutStartSec = 300;
        ExecStartPre = "${cfg.package}/bin/build-agent --config ${configFile} --check-config";
        ExecStart = "${cfg.package}/bin/build-agent --config ${configFile}";
        KillMode = "mixed";
        TimeoutStopSec = cfg.drainTimeoutSecs + 60;
        Restart = "always";
        RestartSec = 5;
        DynamicUser = true;
        StateDirectory = "build-agent";
        CacheDirectory = "build-agent";
        # The agent reads $CREDENTIALS_DIRECTORY/token.
        LoadCredential = [ "token:${cfg.tokenFile}" ];
        Environment = [ "RUST_LOG=info" "CARGO_HOME=/var/cache/build-agent/cargo" ];
        # The job sandbox creates user, PID, IPC and UTS namespaces.
        RestrictNamespaces = false;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = "read-only";
        PrivateTmp = true;
        # The defaults live in StateDirectory/CacheDirectory; other paths must be writable.
        ReadWritePaths = [ "-${cfg.gitCacheDir}" "-${cfg.worktreeDir}" ];
      };
    };
  };
}
