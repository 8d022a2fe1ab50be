from vlm4rec.cli import main

main()
