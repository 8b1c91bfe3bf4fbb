# The option shapes both NixOS modules (build-agent.nix, coordinator.nix) are made of, so
# that each option says only what is its own.
{ lib }:
{
  # A setting buildpool has a default for: null leaves it to buildpool.
  unset = type: description: lib.mkOption {
    type = lib.types.nullOr type;
    default = null;
    inherit description;
  };

  # A setting with the module's default.
  given = type: default: description: lib.mkOption {
    inherit type default description;
  };

  # A setting with no default: the user must give it.
  required = type: description: lib.mkOption {
    inherit type description;
  };
}
