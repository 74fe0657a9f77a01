"""``python -m amax_lightning`` runs the CLI."""

from amax_lightning.cli import main

if __name__ == "__main__":
    main()
