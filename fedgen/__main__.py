"""``python -m fedgen ...`` runs the ``fedgen`` command (where the console script is not installed)."""

from fedgen.cli import main

if __name__ == "__main__":
    main()
