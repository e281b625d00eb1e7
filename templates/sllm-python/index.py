"""Entry point of the sllm-python template: the sllm-faas runtime with the user's handler on `/`."""

from function import handler

from sllm_faas.runtime.server.app import create_app

app = create_app(handler=handler.handle)
