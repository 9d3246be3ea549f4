"""`python -m generator.demo`: build the shapes data set and train, evaluate and document the demo models."""

from generator.demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
