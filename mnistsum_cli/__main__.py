from mnistsum_cli.cli import main

main()
