from megalm.cli.benchmark import main
from megalm.errors import run_cli

if __name__ == "__main__":  # worker processes re-import this file
    run_cli(main)
