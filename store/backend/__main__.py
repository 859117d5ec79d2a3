from store.backend._service.server import main

main()
