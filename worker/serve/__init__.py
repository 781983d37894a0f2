"""A job's life in a running worker: the Celery task, the job runner, result store, leases, lost jobs, heartbeat,
queue adoption, level step-down, metrics and the periodic duties.
"""
