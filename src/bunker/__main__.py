"""`python -m bunker`: the `bunker` command (e.g. as the --remote-path of an ssh:// repository
whose server has bunker in a virtualenv that is not on PATH)."""

from bunker.cli.main import main

if __name__ == "__main__":
    main()
