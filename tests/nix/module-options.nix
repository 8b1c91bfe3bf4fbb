# The option declarations of both NixOS modules, evaluated with a stand-in for nixpkgs'
# `lib` (nixpkgs cannot be fetched where the tests run). Types become their names, so the
# test reads every option's type, default and description as JSON. Only `options` is
# read: the modules' `config` needs nixpkgs itself.
#
#   nix-instantiate --eval --strict --json tests/nix/module-options.nix --arg root ./.
{ root }:
let
  lib = {
    mkOption = attrs: attrs;
    mkEnableOption = name: {
      type = "bool";
      default = false;
      description = "Whether to enable ${name}.";
    };
    types = {
      str = "str";
      package = "package";
      path = "path";
      port = "port";
      bool = "bool";
      float = "float";
      ints.positive = "positive int";
      nullOr = type: "null or ${type}";
      listOf = type: "list of ${type}";
      nonEmptyListOf = type: "non-empty list of ${type}";
      enum = values: "one of ${builtins.concatStringsSep ", " values}";
      either = a: b: "${a} or ${b}";
      # A coordinator is a submodule: its options, as one named "example" declares them.
      attrsOf = type: { attrsOf = type; };
      submodule = module: (module { name = "example"; }).options;
    };
  };
  load = file: import file { inherit lib; config = { }; pkgs = { }; };
in
{
  agent = (load (root + "/nix/build-agent.nix")).options.services.build-agent;
  coordinator = (load (root + "/nix/coordinator.nix")).options.services.buildpool.coordinators.type.attrsOf;
}
