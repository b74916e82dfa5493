"""`python -m b2trl ...`: the `b2trl` command (also what `accelerate launch -m b2trl` and `torchrun -m b2trl` run)."""

from b2trl.cli import main

if __name__ == "__main__":
    main()
