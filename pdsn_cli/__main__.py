from pdsn_cli.cli.app import main

main()
