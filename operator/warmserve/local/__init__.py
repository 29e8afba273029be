"""`warmserve up`: the whole system on one machine (see driver.py)."""
