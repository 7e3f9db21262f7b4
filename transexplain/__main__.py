"""`python -m transexplain` runs the tx-bench CLI (what `torchrun -m transexplain ...` launches)."""
from .cli import main

if __name__ == "__main__":
    main()
