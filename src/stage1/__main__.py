"""``python -m stage1 ...`` runs the command-line interface."""
from stage1.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    main()
