"""`python -m hostgpu`. Guarded: spawned worker children import this module as __mp_main__."""

from hostgpu.cli import main

if __name__ == "__main__":
    main()
