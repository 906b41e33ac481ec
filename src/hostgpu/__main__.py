from hostgpu.cli import main

main()
