//! AMQP reply codes as named values, and the error type every handler returns, so
//! that "which code, channel or connection" is decided in one place.

use amq_protocol::types::Identifier;

/// Reply codes of AMQP 0-9-1 that Warren sends, as RabbitMQ uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ReplyCode {
    /// Normal close.
    Success = 200,
    /// Mandatory message with no route (basic.return).
    NoRoute = 312,
    /// Broker shutting down or connection killed.
    ConnectionForced = 320,
    /// Vhost does not exist / access denied at open.
    AccessRefused = 403,
    /// Entity not found.
    NotFound = 404,
    /// Exclusive queue of another connection, or exclusive consumer.
    ResourceLocked = 405,
    /// Inequivalent arguments, unknown delivery tag, not empty/unused...
    PreconditionFailed = 406,
    /// Malformed frame.
    FrameError = 501,
    /// Malformed method arguments.
    SyntaxError = 502,
    /// Method not valid in this state.
    CommandInvalid = 503,
    /// Bad channel number or channel state.
    ChannelError = 504,
    /// Frame of the wrong type at this point.
    UnexpectedFrame = 505,
    /// Out of a resource (channels).
    ResourceError = 506,
    /// Operation not allowed (vhost, login).
    NotAllowed = 530,
    /// Method or feature not implemented.
    NotImplemented = 540,
    /// Broker bug or store failure.
    InternalError = 541,
}

impl ReplyCode {
    /// Numeric code for the wire.
    pub fn code(self) -> Identifier {
        self as u16
    }

    /// The code of a number another node sent (None for a number Warren never sends).
    pub fn from_code(code: u16) -> Option<ReplyCode> {
        use ReplyCode::*;
        [
            Success,
            NoRoute,
            ConnectionForced,
            AccessRefused,
            NotFound,
            ResourceLocked,
            PreconditionFailed,
            FrameError,
            SyntaxError,
            CommandInvalid,
            ChannelError,
            UnexpectedFrame,
            ResourceError,
            NotAllowed,
            NotImplemented,
            InternalError,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// The symbolic name RabbitMQ puts in front of reply texts.
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::Success => "OK",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether this code closes the whole connection (hard error) rather than a channel.
    pub fn is_connection_error(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }
}

/// An AMQP error raised while handling a method: becomes channel.close or
/// connection.close with this code and text, naming the method that caused it.
#[derive(Debug, Clone)]
pub struct AmqpError {
    /// The reply code.
    pub code: ReplyCode,
    /// Human-readable text, without the symbolic prefix.
    pub text: String,
    /// Class and method ids of the offending method (0, 0 when none).
    pub class_method: (u16, u16),
}

impl AmqpError {
    /// A new error with no offending method recorded yet.
    pub fn new(code: ReplyCode, text: impl Into<String>) -> AmqpError {
        AmqpError {
            code,
            text: text.into(),
            class_method: (0, 0),
        }
    }

    /// The reply text as RabbitMQ formats it: `NOT_FOUND - no queue 'x' in vhost '/'`.
    pub fn reply_text(&self) -> String {
        let mut t = format!("{} - {}", self.code.name(), self.text);
        if t.len() > 255 {
            let mut cut = 255;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
        }
        t
    }

    /// Names the offending method by its class and method ids.
    pub fn at(mut self, class_id: u16, method_id: u16) -> AmqpError {
        self.class_method = (class_id, method_id);
        self
    }

    /// Names `method` as the offending method.
    pub fn caused_by(self, method: &amq_protocol::protocol::AMQPClass) -> AmqpError {
        self.at(method.get_amqp_class_id(), method.get_amqp_method_id())
    }
}

/// Shorthand constructors used by the handlers.
macro_rules! amqp_err {
    ($code:ident, $($arg:tt)*) => {
        $crate::protocol::AmqpError::new($crate::protocol::ReplyCode::$code, format!($($arg)*))
    };
}
pub(crate) use amqp_err;
