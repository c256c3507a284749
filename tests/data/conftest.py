import os

# Nothing in these tests may reach the network; fail fast instead of waiting on a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
