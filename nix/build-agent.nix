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
  # The slot count and the drain timeout: counts that must be at least 1.
  positiveIntOption = default: description: lib.mkOption {
    type = lib.types.ints.positive;
    inherit default description;
  };
in
{
  options.services.build-agent = {
    enable = lib.mkEnableOption "the buildpool build agent";
    package = lib.mkOption {
      type = lib.types.package;
      description = "Package providing bin/build-agent.";
    };
    serverUrls = lib.mkOption {
      type = lib.types.nonEmptyListOf lib.types.str;
      example = [ "wss://coordinator:8081/ws" ];
      description = "Coordinator job-bus URLs; one agent serves all of them from one slot pool.";
    };
    tlsFingerprint = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "sha256:5b0f4c2e9a7d61e8c3b2a19f0e4d7c6b5a4938271605f4e3d2c1b0a9f8e7d6c5";
      description = "Certificate fingerprint the coordinators must present (printed by `buildpool serve`).";
    };
    tlsCaFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Or: CA file the coordinators' certificates must chain to.";
    };
    serverUrl = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Single coordinator URL (seed compatibility); added to serverUrls.";
    };
    id = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Agent id shown by coordinators; defaults to the hostname.";
    };
    maxJobs = positiveIntOption 4 "Concurrent jobs, shared by all coordinators.";
    labels = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Labels jobs can require.";
    };
    gitCacheDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/cache/build-agent/repos";
      description = "One bare cache repository per source repository.";
    };
    worktreeDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/build-agent/workspaces";
      description = "Per-slot warm workspaces.";
    };
    env = lib.mkOption {
      type = lib.types.enum [ "auto" "nix" "host" ];
      default = "auto";
      description = "Where jobs run: the repository's flake dev shell (auto, nix) or the host.";
    };
    prewarmPackages = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "nixpkgs#cargo" "nixpkgs#clippy" ];
      description = "Installables realised at start-up; failures are logged, not fatal.";
    };
    drainTimeoutSecs = positiveIntOption 600 "How long stopping the service lets running jobs finish.";
    maxDiskGb = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.ints.positive lib.types.float);
      default = null;
      description = "Disk budget for workspaces and caches in GB; null: half the free space at start.";
    };
    workspaceTtlDays = positiveIntOption 14 "Repositories not built for this many days lose their workspaces and caches.";
    sandbox = lib.mkOption {
      type = lib.types.enum [ "bwrap" "none" ];
      default = "bwrap";
      description = "How jobs are contained: a bubblewrap sandbox, or none (unsandboxed, warned).";
    };
    sandboxNetwork = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Whether sandboxed jobs reach the network (cargo fetches crates).";
    };
    tokenFile = lib.mkOption {
      type = lib.types.path;
      description = "File holding the coordinators' shared token (passed as a systemd credential).";
    };
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
