"""The io_uring family: `uring`, `uring-py` and `native-uring` over one C event core."""
