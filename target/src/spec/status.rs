//! Completion status: Status Code Type + Status Code, as named by the spec.

/// Status field of a completion (bits 15:1 of CQE DW3, without the phase tag).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub more: bool,
    pub dnr: bool,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Status(sct={:#x}, sc={:#04x}{})",
            self.sct,
            self.sc,
            if self.dnr { ", dnr" } else { "" }
        )
    }
}

macro_rules! statuses {
    ($($name:ident = ($sct:expr, $sc:expr);)*) => {
        impl Status {
            $(pub const $name: Status = Status { sct: $sct, sc: $sc, more: false, dnr: false };)*
        }
    };
}

statuses! {
    // Generic Command Status (SCT 0).
    SUCCESS = (0, 0x00);
    INVALID_OPCODE = (0, 0x01);
    INVALID_FIELD = (0, 0x02);
    CMD_ID_CONFLICT = (0, 0x03);
    DATA_XFER_ERROR = (0, 0x04);
    ABORTED_POWER_LOSS = (0, 0x05);
    INTERNAL_ERROR = (0, 0x06);
    ABORTED_BY_REQUEST = (0, 0x07);
    ABORTED_SQ_DELETION = (0, 0x08);
    INVALID_NAMESPACE = (0, 0x0B);
    COMMAND_SEQUENCE_ERROR = (0, 0x0C);
    INVALID_SGL_DESCRIPTOR = (0, 0x0D);
    DATA_SGL_LENGTH_INVALID = (0, 0x0F);
    SGL_DESCRIPTOR_TYPE_INVALID = (0, 0x11);
    SGL_OFFSET_INVALID = (0, 0x16);
    HOST_ID_INCONSISTENT = (0, 0x18);
    KEEP_ALIVE_EXPIRED = (0, 0x19);
    KEEP_ALIVE_INVALID = (0, 0x1A);
    TRANSIENT_TRANSPORT_ERROR = (0, 0x22);
    NS_NOT_READY = (0, 0x82);
    LBA_OUT_OF_RANGE = (0, 0x80);
    CAPACITY_EXCEEDED = (0, 0x81);
    // Command Specific Status (SCT 1).
    INVALID_QUEUE_ID = (1, 0x01);
    INVALID_QUEUE_SIZE = (1, 0x02);
    ABORT_LIMIT_EXCEEDED = (1, 0x03);
    ASYNC_EVENT_LIMIT_EXCEEDED = (1, 0x05);
    INVALID_LOG_PAGE = (1, 0x09);
    FEATURE_NOT_SAVEABLE = (1, 0x0D);
    FEATURE_NOT_CHANGEABLE = (1, 0x0E);
    // Fabrics command specific (SCT 1).
    CONNECT_INCOMPATIBLE_FORMAT = (1, 0x80);
    CONNECT_CTRL_BUSY = (1, 0x81);
    CONNECT_INVALID_PARAM = (1, 0x82);
    CONNECT_RESTART_DISCOVERY = (1, 0x83);
    CONNECT_INVALID_HOST = (1, 0x84);
    // Media and data integrity errors (SCT 2).
    WRITE_FAULT = (2, 0x80);
    UNRECOVERED_READ_ERROR = (2, 0x81);
    // Path related status (SCT 3).
    INTERNAL_PATH_ERROR = (3, 0x00);
    ANA_PERSISTENT_LOSS = (3, 0x01);
    ANA_INACCESSIBLE = (3, 0x02);
    ANA_TRANSITION = (3, 0x03);
    HOST_PATH_ERROR = (3, 0x70);
}

impl Status {
    /// Do Not Retry: the same command will fail the same way.
    pub const fn dnr(mut self) -> Self {
        self.dnr = true;
        self
    }
    pub const fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// Raw 15-bit status field: SC bits 7:0, SCT 10:8, CRD 12:11, M 13, DNR 14.
    pub const fn to_raw(self) -> u16 {
        (self.sc as u16)
            | ((self.sct as u16 & 7) << 8)
            | ((self.more as u16) << 13)
            | ((self.dnr as u16) << 14)
    }
    pub const fn from_raw(v: u16) -> Self {
        Self {
            sc: (v & 0xff) as u8,
            sct: ((v >> 8) & 7) as u8,
            more: v & (1 << 13) != 0,
            dnr: v & (1 << 14) != 0,
        }
    }
}
