from megalm.cli.compare_optimizers import main
from megalm.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
