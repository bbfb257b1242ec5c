from podwatch.cli import main

main()
