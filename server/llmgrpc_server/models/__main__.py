from llmgrpc_server.models import main

main()
