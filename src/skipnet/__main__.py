"""``python -m skipnet`` (also what ``torchrun -m skipnet`` runs)."""

from skipnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
