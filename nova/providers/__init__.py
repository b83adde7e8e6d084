"""Mail providers behind one small interface (:class:`MailProvider`)."""

from .base import AttachmentStream, ChangeFeed, MailProvider
from .errors import (
    AuthExpired,
    GrantNotFound,
    InvalidApiKey,
    NotFound,
    Permanent,
    ProviderError,
    RateLimited,
    Transient,
    Unauthorized,
)
from .models import Attachment, Grant, Message, Page, Participant, Thread

__all__ = [
    "Attachment", "AttachmentStream", "AuthExpired", "ChangeFeed", "Grant", "GrantNotFound",
    "InvalidApiKey", "MailProvider", "Message", "NotFound", "Page", "Participant",
    "Permanent", "ProviderError", "RateLimited", "Thread", "Transient", "Unauthorized",
]
