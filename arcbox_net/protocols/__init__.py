"""Protocol implementations: a sans-I/O core per protocol plus a thin handler.

The core takes parsed input and returns what to send; the handler (an
IEthernetHandler, IIPv4Handler or IUDPService) connects it to the dispatcher.
"""
