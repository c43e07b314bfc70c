"""``python -m fetcher``."""

from fetcher._console import main

if __name__ == "__main__":
    main()
