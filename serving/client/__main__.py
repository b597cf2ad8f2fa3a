"""`python -m serving.client`: the same command as `cnnserve-client`."""

from serving.client.cli import main

main()
