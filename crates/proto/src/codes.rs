//! Numeric codes that travel in the frame header: opcodes and reply status codes.
//!
//! Numbers are part of the wire format: never renumber, only append. Unknown numbers decode to a
//! typed error (`UnknownCode`) so the server can answer `Status::UnknownOpcode` instead of failing.

use crate::header::HeaderError;

/// A code number that no variant of the enum carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value}")]
pub struct UnknownCode {
    pub what: &'static str,
    pub value: u16,
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $what:literal { $($(#[$vm:meta])* $v:ident = $n:literal,)* }) => {
        $(#[$m])*
        #[repr(u16)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v = $n,)* }

        impl $name {
            /// Every variant, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            pub fn as_u16(self) -> u16 {
                self as u16
            }

            /// Stable lower-case name (metrics labels, logs).
            pub fn name(self) -> &'static str {
                match self { $($name::$v => stringify!($v),)* }
            }
        }

        impl TryFrom<u16> for $name {
            type Error = $crate::codes::UnknownCode;
            fn try_from(v: u16) -> Result<Self, $crate::codes::UnknownCode> {
                match v {
                    $($n => Ok($name::$v),)*
                    _ => Err($crate::codes::UnknownCode { what: $what, value: v }),
                }
            }
        }

        impl From<$name> for u16 {
            fn from(v: $name) -> u16 {
                v as u16
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// What a frame asks for. A reply carries the request's opcode with `FLAG_REPLY` set.
    Opcode: "opcode" {
        /// Handshake: version negotiation, authentication, capabilities (`handshake` module).
        Hello = 1,
        /// Echo: the reply carries the request's bulk data back unchanged; metadata is empty.
        Ping = 2,
        /// Server counters (`StatsReply`).
        Stats = 3,
        /// Upload a tensor: meta `TensorPutReq`, data = its bytes → reply `TensorPutReply`.
        TensorPut = 16,
        /// Download a tensor: meta `TensorGetReq` → reply meta `TensorDesc`, data = its bytes.
        TensorGet = 17,
        /// Release handles: meta `TensorFreeReq` → empty reply.
        TensorFree = 18,
        /// Run an op or a small graph of ops on handles: meta `ExecReq` → reply `ExecReply`.
        Exec = 19,
        // 32..=63: sessions (messages defined by the sessions issue).
        SessionOpen = 32,
        SessionPrefill = 33,
        SessionDecode = 34,
        /// Server → client stream of generated tokens (FLAG_REPLY, same request id, many frames).
        SessionToken = 35,
        SessionCancel = 36,
        SessionAppend = 37,
        SessionClose = 38,
        SessionAttach = 39,
        Logits = 40,
        /// Server → client: the request's input pass paused at a breakpoint (`PausedNote`;
        /// FLAG_REPLY, the paused request's id). Breakpoint messages: `breakpoint` module.
        SessionPaused = 41,
        SessionHiddenRead = 42,
        SessionHiddenWrite = 43,
        SessionResume = 44,
    }
}

wire_enum! {
    /// Outcome of a request, carried in `FrameHeader::status` of its reply. Non-zero = failure; the
    /// reply's metadata is then a UTF-8 message (see `ErrorReply`).
    Status: "status" {
        Ok = 0,
        /// Malformed or truncated frame or metadata.
        BadFrame = 1,
        BadMagic = 2,
        BadVersion = 3,
        UnknownOpcode = 4,
        FrameTooLarge = 5,
        /// Handshake token rejected, or a request before the handshake.
        Unauthorized = 6,
        /// Handle unknown to this tenant (freed, never existed, or another tenant's).
        BadHandle = 7,
        ShapeMismatch = 8,
        DTypeMismatch = 9,
        BadArgument = 10,
        OutOfMemory = 11,
        /// A bounded queue is full; retry later.
        Busy = 12,
        ShuttingDown = 13,
        UnknownModel = 14,
        UnknownSession = 15,
        Internal = 16,
        /// The opcode or op is known but this server/backend does not implement it.
        Unsupported = 17,
        Cancelled = 18,
        /// A limit (handles, sessions, graph nodes) of this tenant was reached.
        LimitExceeded = 19,
        /// Resume, read or write of a session's hidden state while it is not paused at a
        /// breakpoint.
        NotPaused = 20,
    }
}

impl Status {
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

impl From<HeaderError> for Status {
    fn from(e: HeaderError) -> Status {
        match e {
            HeaderError::Truncated(_) => Status::BadFrame,
            HeaderError::BadMagic(_) => Status::BadMagic,
            HeaderError::BadVersion(_) => Status::BadVersion,
            HeaderError::MetaTooLarge { .. } | HeaderError::FrameTooLarge { .. } => Status::FrameTooLarge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknowns_are_typed() {
        for &op in Opcode::ALL {
            assert_eq!(Opcode::try_from(op.as_u16()), Ok(op));
        }
        for &st in Status::ALL {
            assert_eq!(Status::try_from(u16::from(st)), Ok(st));
        }
        assert_eq!(Opcode::try_from(0), Err(UnknownCode { what: "opcode", value: 0 }));
        assert_eq!(Opcode::try_from(0xffff).unwrap_err().value, 0xffff);
        assert!(Status::try_from(999).is_err());
        assert_eq!(Opcode::SessionToken.name(), "SessionToken");
    }
}
