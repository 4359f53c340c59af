"""The `ezengine` command line."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ezengine")
def main() -> None:
    """ezengine trains EfficientZero agents (MuZero Reanalyse with a self-supervised
    consistency loss, value prefix and off-policy correction) on Atari and gymnasium
    environments, and plays and evaluates them."""
