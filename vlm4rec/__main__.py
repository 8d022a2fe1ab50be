from vlm4rec.cli import main

if __name__ == "__main__":  # not when a spawned child (the ranking process) imports it
    main()
