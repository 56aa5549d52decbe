"""Docker front door: libnetwork's remote NetworkDriver and IpamDriver (app.py: HTTP; driver.py: the calls).

Served by the agent on ``--docker-socket``; reads container and network details from ``--docker-api``.
"""
