from fedmi.cli import main

main()
