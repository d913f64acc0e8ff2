from mnistsum_cli.cli.app import main

main()
