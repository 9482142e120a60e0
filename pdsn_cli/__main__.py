from pdsn_cli.cli import main

main()
