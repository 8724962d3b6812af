from services.embedder.server import main

main()
