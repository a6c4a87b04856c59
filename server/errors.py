"""Domain errors, and the one place they become OpenAI-shaped HTTP errors."""

from __future__ import annotations


class TrieserveError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequestError(TrieserveError):
    pass


class ContextLengthError(TrieserveError):
    code = "context_length_exceeded"


class ModelNotFoundRequestError(TrieserveError):
    status_code = 404
    code = "model_not_found"


class QueueFullError(TrieserveError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1


class RequestTimeoutError(TrieserveError):
    status_code = 408
    error_type = "timeout_error"
    code = "request_timeout"


class ServerShuttingDownError(TrieserveError):
    status_code = 503
    error_type = "server_error"
    code = "shutting_down"


class ModelNotReadyError(TrieserveError):
    status_code = 503
    error_type = "server_error"
    code = "model_not_ready"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
