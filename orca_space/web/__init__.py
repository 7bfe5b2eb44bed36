"""The web edge: the gradio page (`ui.py`) and the server around it (`server.py`)."""
