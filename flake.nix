{
  description = "buildpool: a distributed build pool for Rust (coordinator, build agent, MCP server)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # One cargo build per binary, from the locked dependencies; the tests start real
      # servers and fetch crates, so they run in CI, not in the sandboxed Nix build.
      package = pkgs: { pname, crate, bin, description }: pkgs.rustPlatform.buildRustPackage {
        inherit pname;
        version = "0.1.0";
        src = self;
        cargoLock.lockFile = ./Cargo.lock;
        cargoBuildFlags = [ "--package" crate "--bin" bin ];
        doCheck = false;
        nativeBuildInputs = [ pkgs.pkg-config ];
        meta = { inherit description; mainProgram = bin; };
      };
    in
    {
      packages = forAll (pkgs: rec {
        buildpool = package pkgs {
          pname = "buildpool";
          crate = "buildpool-coordinator";
          bin = "buildpool";
          description = "buildpool coordinator, client, MCP server and Claude Code hook";
        };
        build-agent = package pkgs {
          pname = "build-agent";
          crate = "build-agent";
          bin = "build-agent";
          description = "buildpool build agent";
        };
        default = buildpool;
      });

      apps = forAll (pkgs: {
        buildpool = { type = "app"; program = "${self.packages.${pkgs.system}.buildpool}/bin/buildpool"; };
        build-agent = { type = "app"; program = "${self.packages.${pkgs.system}.build-agent}/bin/build-agent"; };
        default = self.apps.${pkgs.system}.buildpool;
      });

      # What the tests need beside cargo (see README, "The two commands").
      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo rustc clippy rustfmt cargo-nextest sccache git bubblewrap prometheus
            redis chromium nodejs python3 procps util-linux
          ];
        };
      });

      nixosModules = {
        build-agent = import ./nix/build-agent.nix;
        coordinator = import ./nix/coordinator.nix;
      };
    };
}
