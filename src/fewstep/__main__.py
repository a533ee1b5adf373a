"""``python -m fewstep`` (and ``torchrun -m fewstep``): the ``fewstep`` command."""

from .cli import main

if __name__ == "__main__":
    main()
