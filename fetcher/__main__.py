"""``python -m fetcher``."""

from fetcher.entry import main

if __name__ == "__main__":
    main()
