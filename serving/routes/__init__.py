"""The API's routes, one module per resource: health, chat, feedback (votes), dashboard, admin."""
