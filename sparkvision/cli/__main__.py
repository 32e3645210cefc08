from sparkvision.cli import main

main()
