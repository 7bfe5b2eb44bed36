"""Conversation links: a snapshot of a chat stored on the server, opened by an unguessable link.

Not gradio's `--share` (a public link to the whole app): a conversation link shows one
conversation, read-only, to whoever has it. `store` keeps snapshots in SQLite, `snapshot` checks
them as an imported file is checked, `links` puts the two together with the limits. No gradio.
"""
