"""Blueshift start-tracking pipeline: hook, operator and the warehouse side of the DAG."""
