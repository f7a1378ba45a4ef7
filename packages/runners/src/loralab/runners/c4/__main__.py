from loralab.runners.c4.cli import main

main()
