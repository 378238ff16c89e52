//! Linux error numbers (asm-generic/errno-base.h, errno.h) and their names
//! for `--strace`.

/// A Linux error number (positive; system calls return its negation).
pub type Errno = i32;

macro_rules! errnos {
    ($($name:ident = $v:expr, $text:expr;)*) => {
        $(
            #[doc = $text]
            pub const $name: Errno = $v;
        )*
        /// The symbolic name and message of an error number, as strace prints them.
        pub fn describe(e: Errno) -> (&'static str, &'static str) {
            match e {
                $( $v => (stringify!($name), $text), )*
                _ => ("E?", "Unknown error"),
            }
        }
    };
}

errnos! {
    EPERM = 1, "Operation not permitted";
    ENOENT = 2, "No such file or directory";
    ESRCH = 3, "No such process";
    EINTR = 4, "Interrupted system call";
    EIO = 5, "Input/output error";
    E2BIG = 7, "Argument list too long";
    ENOEXEC = 8, "Exec format error";
    EBADF = 9, "Bad file descriptor";
    ECHILD = 10, "No child processes";
    EAGAIN = 11, "Resource temporarily unavailable";
    ENOMEM = 12, "Cannot allocate memory";
    EACCES = 13, "Permission denied";
    EFAULT = 14, "Bad address";
    EEXIST = 17, "File exists";
    ENOTDIR = 20, "Not a directory";
    EISDIR = 21, "Is a directory";
    EINVAL = 22, "Invalid argument";
    EMFILE = 24, "Too many open files";
    ENOTTY = 25, "Inappropriate ioctl for device";
    ESPIPE = 29, "Illegal seek";
    EPIPE = 32, "Broken pipe";
    ERANGE = 34, "Numerical result out of range";
    ENAMETOOLONG = 36, "File name too long";
    ENOSYS = 38, "Function not implemented";
    ENOTEMPTY = 39, "Directory not empty";
    ELOOP = 40, "Too many levels of symbolic links";
    EOVERFLOW = 75, "Value too large for defined data type";
    ETIMEDOUT = 110, "Connection timed out";
}
