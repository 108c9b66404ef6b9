"""Thin entry: `python train.py [overrides]` runs crackclf.train (Hydra); see conf/ and README.md."""

from crackclf.train import main

if __name__ == "__main__":
    main()
