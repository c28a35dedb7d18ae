"""The dashboard application: a web page and JSON API (`app`) showing what a crawl of the DHT found
(`crawl`), served from one self-contained page (`page.html`). Run it with `python -m swarm.dashboard`.

An application: nothing in the shared contract imports it.
"""
